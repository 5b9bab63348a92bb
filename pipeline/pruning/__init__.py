"""Structured channel pruning with Torch-Pruning's DepGraph: whole channels removed, coupled layers kept
consistent. `channels` prunes to a MAC/parameter target or to a per-group plan; `latency` allocates channels
against a measured latency table and prunes to that plan."""
