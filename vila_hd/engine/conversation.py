"""A conversation: messages with ``<image>`` placeholders and the images they refer to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vila_hd.images import DEFAULT_MAX_PIXELS, load_image


@dataclass
class Conversation:
    """Chat state: ``messages`` (``{"role", "content"}``, content holding one ``image_token`` per image) and
    ``images`` (in placeholder order). Images added with :meth:`add_image` join the next user message."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending_images: list[Image.Image] = field(default_factory=list)
    image_token: str = "<image>"

    def add_image(self, image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Load ``image`` (path, bytes, PIL, array) now, so a bad file fails here with a clear message."""
        loaded = load_image(image, max_pixels=max_pixels)
        self.pending_images.append(loaded)
        return loaded

    def add_user(self, text: str) -> None:
        """Append a user message; pending images go first, one placeholder (and a newline) each."""
        if self.image_token in text:
            raise ValueError(
                f"the message contains the image placeholder {self.image_token}; add images with "
                "add_image (/image PATH in the chat) instead"
            )
        content = f"{self.image_token}\n" * len(self.pending_images) + text
        self.messages.append({"role": "user", "content": content})
        self.images.extend(self.pending_images)
        self.pending_images = []

    def add_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def pop_user(self) -> None:
        """Undo the last :meth:`add_user` (its images become pending again): used when an answer fails."""
        if not self.messages or self.messages[-1]["role"] != "user":
            return
        n = self.messages.pop()["content"].count(self.image_token)
        if n:
            self.pending_images = self.images[-n:] + self.pending_images
            del self.images[-n:]

    def clear(self) -> None:
        """Forget every message and image (the system prompt stays)."""
        self.messages, self.images, self.pending_images = [], [], []

    def chat_messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages)
