"""Examples shipped with hwnas: a search space of one's own, wired through the search protocols (`cell_space`)."""
