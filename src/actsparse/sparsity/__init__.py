"""The model side of sparsification: what to sparsify (`spec`), the rules, the instrumentation that applies them to
every FFN, and the accounting of what they zeroed.
"""
