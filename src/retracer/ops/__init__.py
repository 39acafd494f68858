"""Operations: what keeps an installation healthy over time (garbage collection, backups)."""
