"""LoRA Studio's Streamlit frame: page config and navigation over the page modules in studio/app/ui.

Pages only read state, call the library and render; no training, registry or diffusion logic lives
here or in studio/app/ui. Start it with ``lora-studio ui`` (binds 127.0.0.1).
"""

import streamlit as st

from studio.core.thirdparty import quiet_third_party

quiet_third_party()  # before any page imports peft: no library noise on the server's console

st.set_page_config(page_title="LoRA Studio", page_icon="🎨", layout="wide")

pages = [
    st.Page("studio/app/ui/generate_page.py", title="Generate", icon="🖼️", default=True),
    st.Page("studio/app/ui/datasets_page.py", url_path="datasets", title="Datasets", icon="🗂️"),
    st.Page("studio/app/ui/train_page.py", url_path="train", title="Train", icon="🏋️"),
    st.Page("studio/app/ui/adapters_page.py", url_path="adapters", title="Adapters", icon="🧩"),
]
st.navigation(pages).run()
