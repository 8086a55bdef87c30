"""Small helpers shared by every stage: logging, atomic files."""
