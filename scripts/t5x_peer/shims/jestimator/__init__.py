# Stub (not the real jestimator): t5x.optimizers imports the Amos optimizer at module level; unused here.
