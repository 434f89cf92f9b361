"""Streamlit pages, one module per page: widgets only; the logic lives in the library."""
