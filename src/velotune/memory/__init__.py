"""velotune.memory"""
