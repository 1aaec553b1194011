#!/usr/bin/env bash
# Start a MONAI Label server that serves the FIAS bundle on a folder of NIfTI studies.
#
#   scripts/monailabel_server.sh STUDIES_DIR [options] [-- extra start_server args]
#
# Options:
#   --port N          port to listen on (default 8000)
#   --host H          address to bind (default 127.0.0.1: this machine only)
#   --app DIR         work folder for the MONAI Label app (default ./fias_monailabel_app).
#                     The monaibundle sample app is copied there once; the bundle goes to DIR/model/fias.
#   --bundle DIR      the bundle to serve (default: bundle/ of this repository)
#   --overlay FILES   merge a label-set overlay (e.g. bundle/configs/acdc.json) into the copy's train.json and
#                     inference.json, and write its class_names into metadata.json (the labels clients see).
#                     Several overlays, comma-separated, are merged in that order
#                     (e.g. bundle/configs/acdc.json,bundle/configs/acdc_12min.json).
#                     MONAI Label itself reads only those three files, never an overlay.
#   --link            symlink the bundle into the app instead of copying it: training from MONAI Label then
#                     writes models/model.pt into the --bundle folder itself. Not with --overlay.
#   --fresh           replace an existing copy in the app by a new copy of --bundle. Without it, a copy left
#                     by an earlier run is kept, with the weights MONAI Label trained into it.
#   --init-model      if the bundle has no models/model.pt, or (in a copy) one that does not fit the network or
#                     cannot be read, write randomly initialised weights (MONAI Label serves inference only if
#                     a model file exists at start-up). Training from those weights is training from scratch.
#   --python PY       interpreter with monailabel + fias-monai installed
#                     (default: $FIAS_LABEL_PYTHON, else `python`)
#   --dry-run         prepare the app folder and print the server command without running it
#
# Everything after `--` goes to `monailabel.main start_server` unchanged, e.g. `-- --conf preload true`.
# The server runs offline: no model-zoo lookups (zoo_source local) and no SAM2 download (sam2 false).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT=8000
HOST=127.0.0.1
APP=./fias_monailabel_app
BUNDLE="$REPO/bundle"
OVERLAY=""
LINK=0
FRESH=0
INIT_MODEL=0
DRY_RUN=0
PY="${FIAS_LABEL_PYTHON:-python}"
STUDIES=""
EXTRA=()

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "monailabel_server.sh: $*" >&2; exit 2; }
say() { echo "monailabel_server.sh: $*" >&2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) PORT="${2:?--port needs a value}"; shift 2 ;;
        --host) HOST="${2:?--host needs a value}"; shift 2 ;;
        --app) APP="${2:?--app needs a value}"; shift 2 ;;
        --bundle) BUNDLE="${2:?--bundle needs a value}"; shift 2 ;;
        --overlay) OVERLAY="${2:?--overlay needs a value}"; shift 2 ;;
        --python) PY="${2:?--python needs a value}"; shift 2 ;;
        --link) LINK=1; shift ;;
        --fresh) FRESH=1; shift ;;
        --init-model) INIT_MODEL=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$STUDIES" ]] || die "only one studies folder, got '$STUDIES' and '$1'"; STUDIES="$1"; shift ;;
    esac
done

[[ -n "$STUDIES" ]] || { usage >&2; die "give the studies folder (NIfTI images; labels in STUDIES/labels/final/)"; }
[[ -d "$STUDIES" ]] || die "studies folder $STUDIES does not exist"
[[ -f "$BUNDLE/configs/inference.json" && -f "$BUNDLE/configs/train.json" && -f "$BUNDLE/configs/metadata.json" ]] \
    || die "$BUNDLE is not a bundle (needs configs/inference.json, train.json and metadata.json)"
OVERLAYS=()
[[ -z "$OVERLAY" ]] || IFS=',' read -r -a OVERLAYS <<< "$OVERLAY"
for f in "${OVERLAYS[@]}"; do [[ -f "$f" ]] || die "overlay $f does not exist"; done
[[ -z "$OVERLAY" || $LINK -eq 0 ]] || die "--overlay edits a copy of the bundle; it cannot be used with --link"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (set --python or FIAS_LABEL_PYTHON)"
"$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('monailabel') and u.find_spec('fias_monai')))" \
    || die "'$PY' cannot import monailabel and fias_monai: pip install -c constraints.txt -e '.[label]' in its venv"

STUDIES="$(cd "$STUDIES" && pwd)"
BUNDLE="$(cd "$BUNDLE" && pwd)"
for i in "${!OVERLAYS[@]}"; do
    OVERLAYS[i]="$(cd "$(dirname "${OVERLAYS[i]}")" && pwd)/$(basename "${OVERLAYS[i]}")"
done
OVERLAY="$(IFS=','; echo "${OVERLAYS[*]}")"
mkdir -p "$APP"
APP="$(cd "$APP" && pwd)"

# 1. The monaibundle sample app, from the installed monailabel (no network).
if [[ ! -f "$APP/main.py" ]]; then
    SAMPLE="$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "monailabel", "sample-apps", "monaibundle"))')"
    if [[ -f "$SAMPLE/main.py" ]]; then
        cp -r "$SAMPLE/." "$APP/"
    else
        TMP="$(mktemp -d)"
        "$PY" -m monailabel.main apps --download --name monaibundle --output "$TMP" >/dev/null
        cp -r "$TMP/monaibundle/." "$APP/"
        rm -rf "$TMP"
    fi
    find "$APP" -name __pycache__ -type d -prune -exec rm -rf {} +
fi

# 2. The bundle as model/fias (the model name clients see).
DEST="$APP/model/fias"
NEW_COPY=0
mkdir -p "$APP/model"
if [[ $LINK -eq 1 ]]; then
    if [[ -e "$DEST" && ! -L "$DEST" ]]; then
        [[ $FRESH -eq 1 ]] || die "$DEST is a copy, not a link; add --fresh to replace it"
        rm -rf "$DEST"
    fi
    ln -sfn "$BUNDLE" "$DEST"
else
    if [[ -L "$DEST" ]]; then
        rm "$DEST"
    elif [[ -e "$DEST" && $FRESH -eq 1 ]]; then
        rm -rf "$DEST"
    fi
    if [[ ! -e "$DEST" ]]; then
        mkdir -p "$DEST"
        # models/last.pt (the resume checkpoint of `monai.bundle run training`, optimizer included) is not needed
        (cd "$BUNDLE" && tar --exclude=./eval --exclude=./logs --exclude=./output --exclude=./mlruns \
            --exclude=./models/last.pt --exclude='__pycache__' -cf - .) | (cd "$DEST" && tar -xf -)
        NEW_COPY=1
    else
        [[ -z "$OVERLAY" ]] || die "$DEST exists; add --fresh to copy the bundle again with the overlay"
        say "keeping the existing $DEST (--fresh replaces it with a new copy of $BUNDLE)"
    fi
fi

# 3. Overlay (new copies only), then check that models/model.pt fits configs/inference.json's network.
#    MONAI Label registers the infer task only when a model file exists at start-up.
"$PY" - "$DEST" "$OVERLAY" "$INIT_MODEL" "$LINK" <<'EOF'
import json, os, sys

from monai.bundle import ConfigParser

dest, overlay, init_model, link = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
cfg_dir, model_pt = os.path.join(dest, "configs"), os.path.join(dest, "models", "model.pt")


def say(msg):
    print(f"monailabel_server.sh: {msg}", file=sys.stderr)


def merge(name, ov, only_existing=False):
    parser = ConfigParser()
    parser.read_config(os.path.join(cfg_dir, name))
    # standalone-run settings MONAI Label never uses for inference; an overlay's values would break inference.json
    skip = {"dataset_dir", "datalist", "num_workers", "cache_workers", "epochs", "batch_size"} if only_existing else set()
    for key, value in ov.items():
        root = key.lstrip("+").split("#")[0]
        if key == "_desc_" or root in skip or (only_existing and root not in parser.config):
            continue
        if key.startswith("+"):
            parser[key[1:]] = parser[key[1:]] + value if isinstance(value, list) else {**parser[key[1:]], **value}
        else:
            parser[key] = value
    config = dict(parser.get())
    if not config.get("_meta_"):
        config.pop("_meta_", None)
    ConfigParser.export_config_file(config, os.path.join(cfg_dir, name), indent=4)
    return parser


if overlay:
    for path in overlay.split(","):  # in the order given: a later overlay's keys win
        ov = ConfigParser.load_config_file(path)
        merge("train.json", ov)
        infer = merge("inference.json", ov, only_existing=True)
    names = infer.get("class_names")
    if not isinstance(names, list):
        sys.exit(f"monailabel_server.sh: {overlay}: class_names must be a list to write metadata.json")
    meta_path = os.path.join(cfg_dir, "metadata.json")
    meta = json.load(open(meta_path))
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["channel_def"] = {str(i): n for i, n in enumerate(names)}
    pred["num_channels"] = len(names)
    # a 2.5D overlay (context_slices k) feeds each slice with k neighbours per side: 2k + 1 input channels
    k = int(infer.get_parsed_content("context_slices", default=0))
    channels = {str(j): "image" if j == k else f"image, slice {j - k:+d}" for j in range(2 * k + 1)}
    meta["network_data_format"]["inputs"]["image"].update(num_channels=2 * k + 1, channel_def=channels)
    meta["label_classes"] = meta["pred_classes"] = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    json.dump(meta, open(meta_path, "w"), indent=4)
    say(f"merged {overlay} into the copy; labels: {names[1:]}")

if not os.path.isfile(model_pt) and os.path.isfile(os.path.join(dest, "models", "model.ts")):
    sys.exit(0)  # a TorchScript model: nothing to check
import torch

parser = ConfigParser()
parser.read_config(os.path.join(cfg_dir, "inference.json"))
parser["bundle_root"], parser["device"] = dest, "cpu"
net = parser.get_parsed_content("network_def")
missing = not os.path.isfile(model_pt)
problem = f"{model_pt} is missing" if missing else None
if not missing:
    from ignite.engine import Engine

    from fias_monai.handlers import WeightsLoader, WeightsLoadError

    try:  # the loader evaluate.json and inference.json use, with their one-line error: unreadable, or weights of
        # another network (e.g. full_res_head.*: a model of acdc_12min.json served without it)
        WeightsLoader(model_pt, {"model": net}, name="monailabel_server", map_location="cpu")(
            Engine(lambda engine, batch: None))
    except WeightsLoadError as e:
        problem = str(e)
if problem is None:
    sys.exit(0)
if init_model and (missing or not link):  # never overwrite the linked bundle's own weights
    os.makedirs(os.path.dirname(model_pt), exist_ok=True)
    torch.save(net.state_dict(), model_pt)
    say(f"{problem}\n--init-model: wrote randomly initialised weights to {model_pt}")
elif missing:
    say(f"WARNING: {problem}, so MONAI Label serves no inference for 'fias' until a restart "
        "after training. Add --init-model to start from random weights.")
else:
    sys.exit(f"monailabel_server.sh: {problem}\nServe a bundle trained with this label set and these overlays, "
             "or add --init-model (without --link) to replace the copy's weights with random ones.")
EOF

CMD=("$PY" -m monailabel.main start_server --app "$APP" --studies "$STUDIES"
     --conf models fias --conf zoo_source local --conf sam2 false --host "$HOST" --port "$PORT")
CMD+=("${EXTRA[@]+"${EXTRA[@]}"}")
say "${CMD[*]}"
if [[ $DRY_RUN -eq 1 ]]; then
    exit 0
fi
export MONAI_ZOO_SOURCE=local
# Multi-GPU training runs `torchrun` from PATH: make it the one next to this python.
PATH="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
export PATH
exec "${CMD[@]}"
