"""Listenable denoising examples for the report: WAV files and an HTML table of players.

:func:`write_audio_examples` writes each example's noisy, cleaned and clean
waveforms as 16-bit WAVs; :func:`audio_table_html` turns the rows it returns
into an HTML fragment with one ``<audio controls>`` player per waveform.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentlab.data.speech import write_wav

# Column order of the table: what the listener hears first to last.
AUDIO_KINDS: tuple[str, ...] = ("noisy", "cleaned", "clean")
_KIND_TITLES = {"noisy": "Noisy", "cleaned": "Cleaned", "clean": "Clean"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file-name stem from ``name``: runs of other than letters, digits, ``._-`` become ``_``."""
    stem = _UNSAFE.sub("_", str(name)).strip("._")
    return stem or "example"


def write_audio_examples(
    out_dir: str | Path, items: Sequence[Mapping[str, Any]], sample_rate: int
) -> list[dict[str, Any]]:
    """Write ``{name}_{kind}.wav`` for each item's waveforms and return one row per item.

    Args:
        out_dir: folder for the WAVs (created if needed).
        items: dicts with ``name`` (str) and waveforms (T,) in [-1, 1] under any
            of ``noisy``, ``cleaned``, ``clean``; other keys (e.g. SNRs) are
            copied into the row. Samples outside [-1, 1] are clipped on writing.
        sample_rate: Hz.

    Returns:
        Rows ``{"name": str, "noisy": "x_noisy.wav", ...}``: file names relative
        to ``out_dir`` for the kinds given, plus the items' other keys.
    """
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for item in items:
        if "name" not in item:
            raise ValueError("every audio example needs a 'name'")
        kinds = [kind for kind in AUDIO_KINDS if item.get(kind) is not None]
        if not kinds:
            raise ValueError(f"audio example {item['name']!r} has none of {', '.join(AUDIO_KINDS)}")
        stem = safe_name(item["name"])
        if stem in used:
            raise ValueError(f"two audio examples map to the same file name {stem!r}")
        used.add(stem)
        row: dict[str, Any] = {k: v for k, v in item.items() if k not in AUDIO_KINDS}
        row["name"] = str(item["name"])
        for kind in kinds:
            audio = np.asarray(item[kind], dtype=np.float32).reshape(-1)
            file_name = f"{stem}_{kind}.wav"
            write_wav(out_dir / file_name, audio, sample_rate)
            row[kind] = file_name
        rows.append(row)
    return rows


def audio_table_html(rows: Sequence[Mapping[str, Any]], *, base: str = "") -> str:
    """An HTML ``<table>`` with one row per example and a player per noisy / cleaned / clean WAV.

    ``rows`` are as returned by :func:`write_audio_examples`; ``base`` is
    prefixed to every file name (the WAV folder relative to the page, e.g.
    ``"audio/"``). Rows with numeric ``snr_noisy_db`` / ``snr_cleaned_db``
    show them under the players. Names and paths are HTML-escaped.
    """
    head = "".join(f"<th>{_KIND_TITLES[k]}</th>" for k in AUDIO_KINDS)
    lines = ['<table class="audio-examples">', f"<thead><tr><th>Example</th>{head}</tr></thead>", "<tbody>"]
    for row in rows:
        cells = [f"<td>{html.escape(str(row['name']))}</td>"]
        for kind in AUDIO_KINDS:
            file_name = row.get(kind)
            if file_name is None:
                cells.append("<td>&ndash;</td>")
                continue
            src = html.escape(f"{base}{file_name}", quote=True)
            note = _snr_note(row, kind)
            cells.append(f'<td><audio controls preload="none" src="{src}"></audio>{note}</td>')
        lines.append(f"<tr>{''.join(cells)}</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines) + "\n"


def _snr_note(row: Mapping[str, Any], kind: str) -> str:
    value = row.get(f"snr_{kind}_db")
    if isinstance(value, int | float | np.floating | np.integer) and np.isfinite(value):
        return f"<br><small>SNR {float(value):.1f} dB</small>"
    return ""
