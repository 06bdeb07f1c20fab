"""Adapters to frameworks, each behind its optional extra and imported only when used:
``rvqstore.integrations.langchain`` (``pip install 'rvqstore[langchain]'``)."""
