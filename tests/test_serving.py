"""What the model servers are started with: docker-compose's vLLM services and GME's template."""

from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_gme_template_renders_gmes_own_prompt():
    template = jinja2.Environment().from_string(
        (ROOT / "serving" / "gme_chat_template.jinja").read_text()
    )
    # The same messages GMEServerEmbedder sends.
    from sidpipe.models.embedders import GMEServerEmbedder

    embedder = GMEServerEmbedder.__new__(GMEServerEmbedder)
    embedder.instruction = "You are a helpful assistant."
    with_image = template.render(messages=embedder.messages("Blue shirt", "data:image/jpeg;x"))
    assert with_image == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Blue shirt<|im_end|>\n"
        "<|im_start|>assistant\n<|endoftext|>"
    )
    text_only = template.render(messages=embedder.messages("Blue shirt", None))
    assert "<|vision_start|>" not in text_only and text_only.endswith("<|endoftext|>")


def test_each_model_has_a_pinned_gpu_vllm_service_wired_to_the_pipeline():
    services = compose()["services"]
    for name, model in (
        ("captioner", "Qwen/Qwen2.5-VL-7B-Instruct"),
        ("interests-llm", "Qwen/Qwen2.5-7B-Instruct"),
        ("gme-embedder", "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct"),
    ):
        service = services[name]
        assert service["image"].startswith("vllm/vllm-openai:v")
        assert model in service["command"]
        assert "healthcheck" in service and "/models" in str(service["volumes"])
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert "--runner" in services["gme-embedder"]["command"]
    assert "/templates/gme_chat_template.jinja" in services["gme-embedder"]["command"]
    for worker in ("cpu-worker", "gpu-worker"):  # the workers run the flows against them
        env = services[worker]["environment"]
        assert env["SIDPIPE_CAPTION_URL"] == "${SIDPIPE_CAPTION_URL-http://captioner:8000/v1}"
        assert env["SIDPIPE_INTERESTS_URL"] == (
            "${SIDPIPE_INTERESTS_URL-http://interests-llm:8000/v1}"
        )
        assert env["SIDPIPE_EMBED_URL"] == "${SIDPIPE_EMBED_URL-http://gme-embedder:8000/v1}"
