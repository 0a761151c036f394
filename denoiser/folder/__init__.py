"""Denoising a whole folder tree, in batch, without ever touching the input.

Files are decoded by reader threads, cut into tiles, and tiles from many files
are batched together for the model; finished images are encoded and written
by writer threads while the model works on the next batch. Every output is
written to a temporary name and renamed, then recorded in a journal beside
the outputs (the input's size and sha256, the output's size and sha256). An
output is skipped only while both still match their record, so a rerun
finishes an interrupted one, and redoes an output whose input was replaced
(whatever its mtime) or that was damaged. Every file gets a row in the
report, saying why it was done or skipped, whatever went wrong with it.

The run touches nothing in the output folder but its outputs, its journal
and lock file, and its own temporary files; an output folder that holds the
input folder is refused.

The package's rooms, each importing only those above it:

- :mod:`~denoiser.folder.results`: a file's row of the report, the reasons, the counts;
- :mod:`~denoiser.folder.journal`: records, claims, the lock, the journal writer;
- :mod:`~denoiser.folder.scan`: the folders checked, the input tree walked into jobs;
- :mod:`~denoiser.folder.reader`: reading, hashing and decoding within the pixel budget;
- :mod:`~denoiser.folder.writer`: the output folder made ready, outputs written and recorded;
- :mod:`~denoiser.folder.plan`: a run cut into chunks for many workers;
- :mod:`~denoiser.folder.predictor`: the model run on fixed-size batches;
- :mod:`~denoiser.folder.pipeline`: jobs in flight between readers, the model and writers;
- :mod:`~denoiser.folder.denoise`: a whole run, or one chunk of a plan;
- :mod:`~denoiser.folder.trees`: the input and output folders, local or object storage;
- :mod:`~denoiser.folder.routing`: which model denoises each image, and how its planes go;
- :mod:`~denoiser.folder.run_report`: the run's report folder.

Nothing of it imports tasks, flows or Prefect. This module re-exports the
names the rest of the project uses.

May import: ``denoiser.core``, ``denoiser.imaging`` (and itself).
"""

from __future__ import annotations

from denoiser.folder.denoise import denoise_chunk_files, denoise_tree
from denoiser.folder.journal import (
    JOURNAL_NAME,
    JOURNAL_PARTS,
    OutputRecord,
    compact_journal,
    format_record,
    parse_journal,
)
from denoiser.folder.plan import CHUNK_FILES_RANGE, ChunkFiles, auto_chunk_files, plan_folder
from denoiser.folder.predictor import BatchPredictor, SelfEnsemble
from denoiser.folder.results import FileResult, count, display_path, write_report
from denoiser.folder.scan import NOT_REGULAR, check_folders, list_files
from denoiser.folder.writer import prepare_output

__all__ = [
    "CHUNK_FILES_RANGE",
    "JOURNAL_NAME",
    "JOURNAL_PARTS",
    "NOT_REGULAR",
    "BatchPredictor",
    "ChunkFiles",
    "FileResult",
    "OutputRecord",
    "SelfEnsemble",
    "auto_chunk_files",
    "check_folders",
    "compact_journal",
    "count",
    "denoise_chunk_files",
    "denoise_tree",
    "display_path",
    "format_record",
    "list_files",
    "parse_journal",
    "plan_folder",
    "prepare_output",
    "write_report",
]
