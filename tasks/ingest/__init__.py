"""Ingestion: read the cells table and modality matrices, check them, copy them to the store.

Pre-flight (`read_cells_table`, `check_modality`) opens every file and checks names,
shapes and ids before any store is written; `write_cells` and `ingest_modality` then
write `inputs/` one block at a time and mark each group complete last.
"""

from tasks.ingest.cells import read_cells_table, write_cells
from tasks.ingest.matrix import ModalityPlan, check_modality, ingest_modality, open_modality
from tasks.ingest.readers import MatrixReader, open_matrix, read_name_file

__all__ = [
    "MatrixReader",
    "ModalityPlan",
    "check_modality",
    "ingest_modality",
    "open_matrix",
    "open_modality",
    "read_cells_table",
    "read_name_file",
    "write_cells",
]
