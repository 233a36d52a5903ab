"""The one error a grader spec or a template raises: a code a program can branch on, a message a
person can act on, and ``param``, the path of the offending field inside the grader spec."""

from __future__ import annotations


class GraderError(ValueError):
    """A grader spec that is not valid, or a template that cannot be rendered for an item.

    ``param`` is a path inside the grader spec in the API's error shape (``operation``,
    ``input[0].content``, ``labels``), or None when no single field is to blame.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.code = code
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


class TemplateMissing(GraderError):
    """A template refers to a value the item or sample does not have (code
    ``template_missing_value``): that item is graded as errored, the spec itself is fine."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__("template_missing_value", message, param)
