"""The model side: loading a model (`loading`), where it runs (`placement`), the FFN adapters of each family
(`adapters`) and the model definitions transformers does not ship (`llada`).
"""
