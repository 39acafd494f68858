"""What a retrace worker does with a crash: check its core dump."""
