"""Running processes inside a branch."""
