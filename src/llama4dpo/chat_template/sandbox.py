"""transformers' jinja environment (ImmutableSandboxedEnvironment) with the bounds compiled in: loops and
calls tick the clock, operators, literals and concatenations are size-checked; and `{% generation %}`."""

from __future__ import annotations

from .limits import _check_binop, _check_call, _check_result, _join_bounded, _tick


def _guarded_environment_class():
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

    class GuardedCodeGenerator(CodeGenerator):
        """Generated code that checks time and sizes: every `{% for %}` iterates through tick_iter (loops and
        calls are the only ways a template repeats work); `a ~ b` and list/tuple/dict literals go through
        the environment, literals because `[x, x]` repeated doubles the size of its repr with no copy."""

        def visit_For(self, node, frame):  # the loop's iterable goes through environment.tick_iter
            self._ticked = getattr(self, "_ticked", set()) | {id(node.iter)}
            super().visit_For(node, frame)

        def visit(self, node, *args, **kwargs):
            if id(node) not in getattr(self, "_ticked", ()):
                return super().visit(node, *args, **kwargs)
            self.write("environment.tick_iter(")
            super().visit(node, *args, **kwargs)
            self.write(")")

        def visit_Concat(self, node, frame):  # jinja writes str_join((a, b, )) here
            self.write("environment.join_bounded((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def _checked(self, visit, node, frame):
            if getattr(node, "ctx", "load") != "load":  # `{% for a, b in x %}`: an assignment target
                return visit(node, frame)
            self.write("environment.checked(")
            visit(node, frame)
            self.write(")")

        def visit_List(self, node, frame):
            self._checked(super().visit_List, node, frame)

        def visit_Tuple(self, node, frame):
            self._checked(super().visit_Tuple, node, frame)

        def visit_Dict(self, node, frame):
            self._checked(super().visit_Dict, node, frame)

    class GuardedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = GuardedCodeGenerator
        # Intercepted operators go through call_binop, and jinja stops folding them at compile time
        # (`{{ 10 ** 10 ** 10 }}` would otherwise hang the compiler).
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        @staticmethod
        def concat(parts):  # every rendered output, block capture ({% set %}...) and macro result
            return _join_bounded(parts)

        @staticmethod
        def join_bounded(parts):
            return _join_bounded(map(str, parts))

        @staticmethod
        def checked(value):
            return _check_result(value)

        @staticmethod
        def tick_iter(iterable):
            for item in iterable:
                _tick()
                yield item

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _check_result(SandboxedEnvironment.call_binop(self, context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own naming, see its call)
            _tick()  # macros (recursion) and `loop(...)` come through here
            args, kwargs = _check_call(__obj, args, kwargs)
            return _check_result(SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

    return GuardedEnvironment


def _generation_extension():
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text); we render the body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation
