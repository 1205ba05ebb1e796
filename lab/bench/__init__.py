"""The benches: each measures one part of the system and saves its result (``lab.bench.store``)."""
