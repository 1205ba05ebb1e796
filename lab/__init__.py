"""The lab: what starts, measures or breaks the system on one machine (see docs/architecture.md)."""
