"""Prompt bundles: format v1 (`format`, `manifest`, `st_header`, `validate`), the versioned filesystem store
(`store`, `store_index`, `store_safety`, `names`), their errors (`errors`) and the `m2pt bundle` CLI (`cli`).

Importing the package loads nothing; import the submodule you need (e.g. `from prompts_store.store import
BundleStore`, `from prompts_store.format import save_bundle, load_bundle`).
"""
