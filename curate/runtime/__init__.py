"""Run-time plumbing shared by every stage: atomic files, progress display, device choice."""
