"""The outbox: files written under ``/.outbox/<scope>/<dataset>/`` become Rucio uploads (SPEC §5)."""
