"""kangaroo_train: training the Kangaroo adapter (data pipeline, feature cache, Lightning module, Hydra entry point).

Kept free of heavy imports: import the submodules you need (``kangaroo_train.data``, ``kangaroo_train.features``).
"""
