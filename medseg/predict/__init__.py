"""medseg.predict: batch prediction with a MONAI bundle (``medseg predict``).

- :mod:`~medseg.predict.discovery`: which files/folders are cases, their stable ids, fingerprints, shards;
- :mod:`~medseg.predict.engine`: :class:`BatchPredictor`, the pipelined load -> infer -> write engine;
- :mod:`~medseg.predict.state`: done markers and leftovers of killed runs (resuming);
- :mod:`~medseg.predict.report`: ``report.json`` / ``report.csv``, shard merging, exit codes;
- :mod:`~medseg.predict.command`: the ``medseg predict`` command line;
- :mod:`~medseg.predict.dicomweb`, :mod:`~medseg.predict.dimse`, :mod:`~medseg.predict.pacs`: a PACS as
  source (QIDO-RS / WADO-RS) and sink (STOW-RS / C-STORE); :mod:`~medseg.predict.listener`: ``medseg listen``.
"""

from __future__ import annotations

from medseg._lazy import lazy_exports

# public name -> defining module, imported on first access so that ``medseg --help`` stays fast
_LAZY: dict[str, str] = {
    "EXIT_CODES": "medseg.predict.report",
    "FORMATS": "medseg.predict.engine",
    "BatchPredictor": "medseg.predict.engine",
    "Case": "medseg.predict.discovery",
    "DicomwebSource": "medseg.predict.dicomweb",
    "Listener": "medseg.predict.listener",
    "open_store": "medseg.predict.pacs",
    "CaseResult": "medseg.predict.report",
    "SetupError": "medseg.predict.engine",
    "case_id": "medseg.predict.discovery",
    "discover_cases": "medseg.predict.discovery",
    "fingerprint": "medseg.predict.discovery",
    "load_checkpoint": "medseg.predict.engine",
    "merge_reports": "medseg.predict.report",
    "parse_shard": "medseg.predict.discovery",
    "read_report": "medseg.predict.report",
    "select_shard": "medseg.predict.discovery",
    "write_report": "medseg.predict.report",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, eager=())
