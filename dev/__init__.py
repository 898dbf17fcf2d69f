"""Developer tooling (not shipped in the mitoseg package or the Bento)."""
