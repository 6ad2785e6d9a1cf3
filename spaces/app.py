"""BLIP's web app as a Hugging Face Space: push this folder to a Gradio Space as it is.

The Space's settings (environment variables) choose the models, as `BlipApp.from_environment` reads them:
BLIP_CAPTION_MODEL and BLIP_VQA_MODEL (Salesforce's base checkpoints unless set; an empty value drops the tab),
BLIP_RETRIEVAL_MODEL with BLIP_INDEX for text-to-image search, BLIP_VOCAB_FILE for original .pth files. Run it
locally the same way: `python spaces/app.py`, then open http://127.0.0.1:7860/.
"""

import os

from transformers_blip.app import BlipApp, build_interface, launch_interface

app = BlipApp.from_environment()
demo = build_interface(app)  # the name Spaces and `gradio app.py` reload mode look for

if __name__ == "__main__":
    # A Space sets GRADIO_SERVER_NAME=0.0.0.0; on a desktop the app stays on this machine.
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    launch_interface(app, host=host, port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), page=demo)
