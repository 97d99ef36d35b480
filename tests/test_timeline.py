"""The timeline page is valid HTML whose SVG shows every attempt, fault and rebuild."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from gpuwarden.projections.errors import TaskNotFoundError, TimelineError
from gpuwarden.projections.timeline import render_timeline

from tests.test_projections_log import sample_log

SVG = "{http://www.w3.org/2000/svg}"
VOID = {"meta", "br", "img", "input", "link", "hr"}


class Balance(HTMLParser):
    """Fails on a close tag that does not match the open one (HTML void tags aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: object) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse(page: str) -> ET.Element:
    assert page.startswith("<!DOCTYPE html>")
    checker = Balance()
    checker.feed(page)
    assert checker.stack == []
    # The page is also well-formed XML, so the SVG can be inspected element by element.
    return ET.fromstring(page[page.index("<html") :])


def classes(root: ET.Element, kind: str) -> list[ET.Element]:
    return [el for el in root.iter() if kind in (el.get("class") or "").split()]


def test_a_flapping_task_shows_each_attempt_its_faults_and_the_rebuild() -> None:
    root = parse(render_timeline(sample_log().stored, task_id="t1"))
    bars = classes(root, "attempt")
    assert [b.get("class") for b in bars] == ["attempt rebuilt", "attempt completed"]
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "attempt 1" in labels and "attempt 2" in labels
    faults = classes(root, "fault")
    assert len(faults) == 1
    assert "xid 79" in (faults[0].findtext(f"{SVG}title") or "")
    [arrow] = classes(root, "rebuild")
    assert arrow.findtext(f"{SVG}title") == "rebuild: gpu_hardware (counted)"
    title = root.findtext("head/title") or ""
    assert title.startswith("task t1") and "completed" in title


def test_node_loss_is_a_marker_on_the_attempt() -> None:
    root = parse(render_timeline(sample_log().stored, task_id="t3"))
    [bar] = classes(root, "attempt")
    assert bar.get("class") == "attempt rebuilt"
    [marker] = classes(root, "fault")
    assert "node n1 lost" in (marker.findtext(f"{SVG}title") or "")


def test_a_gpu_timeline_has_one_row_per_tenant_and_its_quarantine() -> None:
    stored = sample_log().stored
    root = parse(render_timeline(stored, gpu="G2"))
    tips = [b.findtext(f"{SVG}title") for b in classes(root, "attempt")]
    assert tips == ["task t2 attempt 1 on n1: failed", "task t3 attempt 1 on n1: rebuilt"]
    g1 = parse(render_timeline(stored, gpu="G1"))
    assert len(classes(g1, "fault")) == 2  # the fault row and the tenant's bar
    spans = [r for r in g1.iter(f"{SVG}rect") if r.findtext(f"{SVG}title", "").startswith("q")]
    assert [s.findtext(f"{SVG}title") for s in spans] == ["quarantined: xid 79"]


def test_text_is_escaped() -> None:
    from gpuwarden.engine.core import events as ev

    from tests.test_projections_log import LogBuilder

    b = LogBuilder()
    b.add(ev.TaskSubmitted, task_id="t", name="<script>x</script>", image="i", command=("x",))
    b.add(ev.TaskScheduled, task_id="t", attempt=1, node="n&1", gpu_uuids=("G<1>",))
    page = render_timeline(b.stored, task_id="t")
    assert "<script>" not in page
    parse(page)


def test_nothing_to_draw_is_an_error() -> None:
    stored = sample_log().stored
    with pytest.raises(TaskNotFoundError):
        render_timeline(stored, task_id="nope")
    with pytest.raises(TimelineError):
        render_timeline(stored, gpu="nope")
    with pytest.raises(TimelineError):
        render_timeline(stored)
