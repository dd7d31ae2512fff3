"""One wording for the stages that skip slides without patches (pretrain, eval mil, heatmap)."""

from __future__ import annotations

from typing import Sequence


def ignored_empty_note(slide_ids: Sequence[str], limit: int = 10) -> str:
    """``"ignored 1 slide with no patches: boxes"`` (the first ``limit`` ids, then how many more)."""
    ids = list(slide_ids)
    names = ", ".join(ids[:limit]) + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")
    return f"ignored {len(ids)} slide{'s' if len(ids) != 1 else ''} with no patches: {names}"
