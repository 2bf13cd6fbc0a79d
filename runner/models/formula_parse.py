"""lme4 formula text -> its structure (no data involved).

`formulae` (the parser bambi uses) expands the common part (`a*b`, `a/b`, `(a+b)**2`, `0 +`,
`- 1`, `-` to drop a term) and each group term's expression. It knows neither `||` nor which
group-specific terms came from one `( ... | g)` block (it splits them), so group terms are cut out
of the text here first: every `(expr | factor)` or `(expr || factor)` must be added at the top level
of the right-hand side. A factor is `g`, `g:h` (the interaction of two columns) or `g/h` (nesting:
`(1 | g/h)` is `(1 | g) + (1 | g:h)`).

Only plain columns are accepted as variables: function calls (`log(x)`, `C(a)`, `I(x**2)`) and
numeric literals are refused, so a parameter always means a column of the data as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadInput

Term = tuple[str, ...]  # the columns of one term, in the order written; () is the intercept


@dataclass(frozen=True)
class GroupTerm:
    """One `(expr | factor)` block (after splitting a nested factor `g/h`)."""

    intercept: bool
    terms: tuple[Term, ...]
    factor: Term
    correlated: bool
    text: str


@dataclass(frozen=True)
class ParsedFormula:
    text: str
    response: str
    response_level: str | None  # `y[yes]`: the level that counts as a success (bernoulli)
    intercept: bool
    terms: tuple[Term, ...]
    groups: tuple[GroupTerm, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the formula reads, response first, each once."""
        seen = [self.response]
        for term in self.terms:
            seen.extend(term)
        for group in self.groups:
            for term in group.terms:
                seen.extend(term)
            seen.extend(group.factor)
        return tuple(dict.fromkeys(seen))


def _bad(formula: str, reason: str) -> BadInput:
    return BadInput(f"formula {formula!r}: {reason}")


def _describe(text: str, formula: str, part: str):
    import formulae  # here: it imports pandas and more, which Python models never need

    try:
        return formulae.model_description(text)
    except Exception as error:  # formulae's ParseError / ScanError / ValueError
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _bad(formula, f"cannot parse {part.strip()!r}: {message}") from None


def _term_columns(term, formula: str, where: str) -> Term:
    names = []
    for component in getattr(term, "components", []):
        kind = type(component).__name__
        name = getattr(component, "name", None)
        if kind == "Call":
            raise _bad(
                formula,
                f"{where}: function call {name!r} is not supported; transform the column in the data",
            )
        if kind != "Variable" or not isinstance(name, str):
            raise _bad(formula, f"{where}: {name!r} is not a column name")
        if getattr(component, "reference", None) is not None:
            raise _bad(formula, f"{where}: level subset {name}[{component.reference}] only fits the response")
        names.append(name)
    return tuple(names)


def _common_part(text: str, formula: str, where: str) -> tuple[bool, tuple[Term, ...]]:
    """(has intercept, terms) of a right-hand side without group terms."""
    description = _describe(f"consensusfit_response ~ {text}", formula, text)
    if description.group_terms:
        raise _bad(formula, f"{where}: a group term inside {text!r} must stand on its own")
    intercept, terms = False, []
    for term in description.common_terms:
        if type(term).__name__ == "Intercept":
            intercept = True
        else:
            terms.append(_term_columns(term, formula, where))
    return intercept, tuple(terms)


def _matching(text: str, start: int, formula: str) -> int:
    depth = 0
    for position in range(start, len(text)):
        if text[position] == "(":
            depth += 1
        elif text[position] == ")":
            depth -= 1
            if depth == 0:
                return position
    raise _bad(formula, "unbalanced parentheses")


def _split_bar(inner: str) -> tuple[str, str, bool] | None:
    """`expr | factor` or `expr || factor` at depth 0 of `inner`, else None."""
    depth = 0
    for position, char in enumerate(inner):
        depth += char == "("
        depth -= char == ")"
        if char == "|" and depth == 0:
            double = inner[position + 1 : position + 2] == "|"
            rest = inner[position + (2 if double else 1) :]
            return inner[:position], rest, not double
    return None


_FACTOR_PART = re.compile(r"^\s*(`[^`]+`|[A-Za-z_.][A-Za-z0-9_.]*)\s*$")


def _factor(text: str, formula: str, block: str) -> list[Term]:
    """`g` -> [(g,)], `g:h` -> [(g, h)], `g/h` -> [(g,), (g, h)]."""
    nested = text.split("/")
    factors: list[Term] = []
    prefix: list[str] = []
    for part in nested:
        names = []
        for piece in part.split(":"):
            match = _FACTOR_PART.match(piece)
            if not match:
                raise _bad(
                    formula, f"group term {block!r}: factor {text.strip()!r} must be columns joined by : or /"
                )
            names.append(match.group(1).strip("`"))
        prefix = prefix + names
        factors.append(tuple(prefix))
    return factors


def _group_terms(rhs: str, formula: str) -> tuple[str, list[GroupTerm]]:
    """Cut the `( .. | .. )` blocks out of the right-hand side: (what is left, the blocks)."""
    groups: list[GroupTerm] = []
    kept: list[str] = []
    position = 0
    while position < len(rhs):
        char = rhs[position]
        if char != "(":
            kept.append(char)
            position += 1
            continue
        end = _matching(rhs, position, formula)
        inner = rhs[position + 1 : end]
        bar = _split_bar(inner)
        if bar is None:
            if "|" in inner:
                raise _bad(formula, f"group term {rhs[position:end + 1]!r} must be added on its own")
            kept.append(rhs[position : end + 1])
            position = end + 1
            continue
        block = rhs[position : end + 1]
        before = "".join(kept).rstrip()
        after = rhs[end + 1 :].lstrip()
        if (before and not before.endswith("+")) or (after and not after.startswith("+")):
            raise _bad(formula, f"group term {block!r} must be added at the top level (… + {block})")
        expression, factor_text, correlated = bar
        if "|" in factor_text:
            raise _bad(formula, f"group term {block!r}: more than one bar")
        if not expression.strip():
            raise _bad(formula, f"group term {block!r} has nothing before the bar")
        intercept, terms = _common_part(expression, formula, f"group term {block!r}")
        if not intercept and not terms:
            raise _bad(formula, f"group term {block!r} has no columns")
        for factor in _factor(factor_text, formula, block):
            groups.append(GroupTerm(intercept, terms, factor, correlated, block))
        position = end + 1
        # drop the '+' that joined the block to the rest
        if before:
            kept = list(before[:-1])
        elif after:
            position = len(rhs) - len(after) + 1
    rest = "".join(kept)
    if "|" in rest:
        raise _bad(formula, "a group term needs parentheses, e.g. (1 + x | g)")
    return rest.strip(), groups


def parse_formula(formula: object) -> ParsedFormula:
    """Parse an lme4 formula; refusals name the offending part in one line."""
    if not isinstance(formula, str) or not formula.strip():
        raise BadInput(f"spec.model.formula must be a non-empty string, got {formula!r}")
    if formula.count("~") != 1:
        raise _bad(formula, "needs exactly one '~' (response ~ terms)")
    left, rhs = formula.split("~")
    if not left.strip():
        raise _bad(formula, "has no response before '~'")
    if not rhs.strip():
        raise _bad(formula, "has no terms after '~' (use 1 for an intercept-only model)")
    response = _describe(f"{left} ~ 1", formula, left).response.term
    components = getattr(response, "components", [])
    if len(components) != 1 or type(components[0]).__name__ != "Variable":
        raise _bad(formula, f"response {left.strip()!r} must be one column; transform it in the data")
    response_name = components[0].name
    if not isinstance(response_name, str):
        raise _bad(formula, f"response {left.strip()!r} is not a column name")
    level = components[0].reference
    rest, groups = _group_terms(rhs, formula)
    intercept, terms = _common_part(rest, formula, "common terms") if rest else (True, ())
    seen: set = set()
    for group in groups:
        key = (group.factor, group.intercept, frozenset(group.terms))
        if key in seen:
            raise _bad(formula, f"group term {group.text!r} appears twice for {':'.join(group.factor)}")
        seen.add(key)
    for columns in [terms] + [group.terms for group in groups]:
        for term in columns:
            if response_name in term:
                raise _bad(formula, f"the response {response_name!r} also appears as a predictor")
    return ParsedFormula(
        text=formula,
        response=response_name,
        response_level=None if level is None else str(level),
        intercept=intercept,
        terms=terms,
        groups=tuple(groups),
    )
