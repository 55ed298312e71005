"""velotune.export"""
