"""The sae-kit server (FastAPI): thin routers over sae_kit; see app.py."""
