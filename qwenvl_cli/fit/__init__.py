"""What is checked before a download: GPUs, the memory estimate, installed packages. No torch."""
