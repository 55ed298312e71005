"""velotune.quant"""
