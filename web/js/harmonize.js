// ComfyUI-Harmonize: show on the node the text a Harmonize node reports after it runs (the saved LUT's file
// name, the zero-shot work counts, metrics, scores and decisions, the descriptions and the VLM's answer).
//
// The nodes return it as {"ui": {"text": [...]}}; the front end draws such text only on its own preview
// nodes, so this extension puts it in a read-only text box at the bottom of the node that sent it. The box is
// not saved with the workflow and is not an input: widgets_values and the queued prompt stay as they were.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/harmonize.js
import { api } from "../../../scripts/api.js";

const WIDGET_NAME = "harmonize_report";

function reportWidget(node) {
    const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (existing) return existing;
    let widget;
    if (typeof node.addDOMWidget === "function") {
        const box = document.createElement("textarea");
        box.readOnly = true;
        box.spellcheck = false;
        box.className = "comfy-multiline-input harmonize-report";
        box.style.cssText = "font-family: monospace; font-size: 11px; white-space: pre; overflow: auto; opacity: 0.9;";
        box.dataset.harmonizeReport = String(node.id);
        widget = node.addDOMWidget(WIDGET_NAME, "harmonize_report", box, {
            getValue: () => box.value,
            setValue: (v) => { box.value = v ?? ""; },
            serialize: false,
            // as tall as the text (a file name: one line; a work report or a log: up to 12 lines, then scroll)
            getMinHeight: () => 12 + 14 * Math.min(12, Math.max(1, box.value.split("\n").length)),
        });
        widget.element = box;
    } else {  // a front end without DOM widgets: a plain read-only text widget
        widget = node.addWidget("text", WIDGET_NAME, "", () => {}, { serialize: false, disabled: true });
    }
    widget.serialize = false;  // never part of widgets_values
    return widget;
}

function showReport(node, lines) {
    const text = lines.map((line) => String(line)).join("\n");
    const widget = reportWidget(node);
    if (widget.element) widget.element.value = text;
    widget.value = text;
    const wanted = node.computeSize ? node.computeSize() : node.size;
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    node.graph?.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas?.(true, true);
}

// A node ComfyUI takes from its cache (an earlier run had the same inputs) does not run, so a freshly loaded
// graph's node gets no text through onExecuted; once the prompt has finished, its text is read from the
// prompt's history and drawn on every Harmonize node that does not show it yet.
async function fillFromHistory(promptId) {
    if (!promptId) return;
    try {
        const response = await api.fetchApi(`/history/${encodeURIComponent(promptId)}`);
        if (!response.ok) return;
        const outputs = (await response.json())?.[promptId]?.outputs ?? {};
        for (const [id, output] of Object.entries(outputs)) {
            const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
            if (!node || !node.type?.startsWith("Harmonize") || !Array.isArray(output?.text)) continue;
            const shown = node.widgets?.find((w) => w.name === WIDGET_NAME);
            if (!shown || !shown.value) showReport(node, output.text);
        }
    } catch (error) {
        console.warn("ComfyUI-Harmonize: could not read the run's history for the node reports", error);
    }
}

api.addEventListener("execution_success", ({ detail }) => fillFromHistory(detail?.prompt_id));

app.registerExtension({
    name: "ComfyUI-Harmonize.ReportText",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("Harmonize")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            const r = onExecuted?.apply(this, arguments);
            const text = output?.text;
            if (Array.isArray(text) && text.length) showReport(this, text);
            else if (typeof text === "string" && text) showReport(this, [text]);
            return r;
        };
    },
});
