"""Markdown tables generated from the limits data, for the README and docs/ (and ``make docs``).

The committed documents hold these tables between ``<!-- generated:NAME -->`` and
``<!-- end generated -->`` markers; ``python -m flux_adapters._tables`` rewrites them, and a test
fails when a document and the data disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from flux_adapters.limits import ModelLimits
from flux_adapters.providers import BUILT_IN, get_adapter
from flux_adapters.request import MODELS

__all__ = ["billing_table", "limits_table", "models_table", "render", "rewrite"]


def _refs(limits: ModelLimits) -> str:
    # The notation of every other range here and of the violations (`IntRange`): "0..8".
    low, high = limits.images.low, limits.images.high
    return str(low) if low == high else f"{low}..{high}"


def models_table() -> str:
    """Providers x models: which provider offers which model, and how many reference images."""
    providers = list(BUILT_IN)
    lines = [
        "| model | " + " | ".join(f"`{p}`" for p in providers) + " |",
        "|---" * (len(providers) + 1) + "|",
    ]
    for model in MODELS:
        cells = []
        for provider in providers:
            limits = get_adapter(provider).limits.get(model)
            count = _refs(limits) if limits else ""
            cells.append(f"{count} image{'' if count == '1' else 's'}" if limits else "—")
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size(limits: ModelLimits) -> str:
    parts = []
    if limits.sizes is not None:
        parts.append(
            limits.sizes.describe()
            + (" (`width`/`height` or `size`)" if limits.size_string else "")
        )
    if limits.ratios is not None:
        parts.append("aspect ratio " + limits.ratios.describe())
    return "; ".join(parts) or "none"


def limits_table(provider: str) -> str:
    """One provider's limits for each model it offers."""
    header = (
        "| model | wire id | refs | output size | safety_tolerance | steps | guidance | "
        "prompt_upsampling | formats | prompt | seed |"
    )
    lines = [header, "|---" * 11 + "|"]
    for model, limits in get_adapter(provider).limits.items():
        wire = f"`{limits.wire_model}`"
        if limits.edit_wire_model:
            wire += f", edits `{limits.edit_wire_model}`"
        cells = [
            f"`{model}`",
            wire,
            _refs(limits),
            _size(limits),
            str(limits.safety_tolerance) if limits.safety_tolerance else "—",
            str(limits.steps) if limits.steps else "—",
            str(limits.guidance) if limits.guidance else "—",
            "yes" if limits.prompt_upsampling else "—",
            " / ".join(limits.output_formats),
            f"≤ {limits.prompt_max_chars} chars" if limits.prompt_max_chars else "—",
            str(limits.seed),
        ]
        # A provider package's text (a wire id, say) may hold a "|", which would end the cell.
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    first = next(iter(get_adapter(provider).limits.values()))
    rule = first.image
    lines += [
        "",
        f"Reference images: given as {', '.join(sorted(k.replace('_', ' ') for k in rule.kinds))}; "
        f"local ones at most {rule.max_bytes // (1024 * 1024)} MB "
        f"and {rule.max_pixels / 1e6:g} MP, formats {' / '.join(sorted(rule.formats))}.",
        "",
        f"Source: {first.source}",
    ]
    return "\n".join(lines)


def billing_table() -> str:
    """The billing rule (``flux_adapters.routing.BILLING_RULES``): every row, with its reason."""
    from flux_adapters.routing import BILLING_RULES

    actions = {
        "retry": "retry the same provider, then fail over",
        "next": "fail over",
        "ambiguous": "**raise** (fail over only with `failover_on_ambiguous=True`)",
        "final": "raise; never fails over",
    }
    lines = [
        "| failure | proves | what happens | row | why |",
        "|---|---|---|---|---|",
    ]
    for rule in BILLING_RULES:
        proves = "**may be billed**" if rule.proves == "may be billed" else rule.proves
        lines.append(
            f"| {rule.failure} | {proves} | {actions[rule.disposition]} | `{rule.name}` "
            f"| {rule.reason} |"
        )
    return "\n".join(lines)


def render(name: str) -> str:
    """The table called *name*: ``models``, ``billing`` or ``limits-<provider>``."""
    if name == "models":
        return models_table()
    if name == "billing":
        return billing_table()
    if name.startswith("limits-"):
        return limits_table(name.removeprefix("limits-"))
    raise KeyError(name)


_BLOCK = re.compile(
    r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?:.*?\n)?(<!-- end generated -->)", re.DOTALL
)


def rewrite(text: str) -> str:
    """Return *text* with every generated block replaced by the current table."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + "\n" + m.group(3), text)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        path = Path(argument)
        path.write_text(rewrite(path.read_text()))
