"""velotune.data"""
