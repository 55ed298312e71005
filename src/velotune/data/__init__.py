"""velotune.data: chat templates, data set formats, tokenization with counted bad rows, response-only
labels and padding-free packing.

    chat_templates.py  get_chat_template, CHAT_TEMPLATES (Jinja bodies in templates/*.jinja)
    custom_template.py apply_chat_template (a template from a {SYSTEM}/{INPUT}/{OUTPUT} example)
    formats.py         load_dataset_file, standardize_sharegpt, standardize_data_formats, to_sharegpt, to_messages
    prepare.py         tokenize_conversations, validate_preference_rows -> (Dataset, DataReport)
    report.py          DataReport (counts and row indices per reason)
    masking.py         train_on_responses_only, response_labels
    packing.py         pack_dataset, PaddingFreeCollator
"""
