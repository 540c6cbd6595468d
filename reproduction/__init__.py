"""The small-scale reproduction of the paper's claims: training recipes (:mod:`reproduction.train`), the grid-VQ
baseline (:mod:`reproduction.grid_vq`) and the scorer that writes the tables of benchmarks/RESULTS.md
(:mod:`reproduction.score`). Entry point: ``python -m reproduction {train,score}`` from the repository root."""
