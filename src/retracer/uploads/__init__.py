"""The upload spool: checks, file operations, intake and rescue."""
