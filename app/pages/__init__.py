"""One module per dashboard page. Each defines ``render()``; Streamlit runs the file as the page script."""
