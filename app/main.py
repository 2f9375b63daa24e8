"""The dashboard's entry script: ``streamlit run app/main.py -- --db STORE`` (what ``routelens app`` runs).

Draws the sidebar (store and run pickers, ``state.sidebar``) and hands over to the chosen page; each page is one
module under ``app/pages/`` (run as the page script by ``st.navigation``).
"""
from pathlib import Path

import streamlit as st

from routelens.app import state

HERE = Path(__file__).resolve().parent
PAGES = [
    ("runs.py", "Runs", ":material/list:"),
    ("overview.py", "Overview", ":material/grid_on:"),
    ("tokens.py", "Tokens", ":material/text_fields:"),
    ("consistency.py", "Consistency", ":material/timeline:"),
    ("super_experts.py", "Super experts", ":material/bolt:"),
    ("crosslingual.py", "Cross-lingual", ":material/translate:"),
    ("cognitive.py", "Cognitive experts", ":material/psychology:"),
    ("steering.py", "Steering", ":material/tune:"),
]

st.set_page_config(page_title="routelens", layout="wide", page_icon=":material/route:")
pages = [st.Page(str(HERE / "pages" / f), title=t, icon=i, default=(n == 0)) for n, (f, t, i) in enumerate(PAGES)]
nav = st.navigation(pages)
with st.sidebar:
    st.markdown("**routelens** · MoE routing")
state.sidebar()
nav.run()
