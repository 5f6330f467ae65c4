"""Batch-system hooks (prologue, epilogue, job starter) and the exit-code table."""
