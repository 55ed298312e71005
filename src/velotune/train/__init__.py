"""velotune.train"""
