"""routelens.app: the Streamlit dashboard over the trace store. Installed as routelens.app."""
