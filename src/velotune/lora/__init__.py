"""velotune.lora"""
