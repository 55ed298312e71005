"""velotune.demo"""
