"""Model cards: results table, model-index metadata per setting, recipe with the real architecture."""

import yaml
from huggingface_hub import ModelCard

from conftest import tiny_config
from msn_hf import MSNImageProcessor, MSNModel
from msn_hf.modelcard import backbone_name, update_model_card, write_model_card

SETTINGS = ("1-shot", "2-shot", "5-shot", "10-shot", "1%")


def lowshot_results(offset: float) -> dict:
    """Results shaped as `evaluate_lowshot` returns them, with distinct values per encoder and setting."""
    def encoder(base):
        logistic = {
            name: {"mean": base + 0.01 * i, "std": 0.002 * (i + 1), "runs": [base + 0.01 * i] * 3}
            for i, name in enumerate(SETTINGS)
        }
        return {"num_features": 64, "logistic": logistic, "knn": base + 0.05}

    return {
        "encoders": {"msn": encoder(0.5 + offset), "random": encoder(0.2), "pixels": encoder(0.3)},
        "settings": {"shots": [1, 2, 5, 10], "label_fraction": 0.01, "seeds": [0, 1, 2], "knn_k": 20,
                     "num_train": 1437, "num_test": 360, "num_labels": 10},
    }  # fmt: skip


def front_matter(path) -> dict:
    return yaml.safe_load(path.read_text().split("---")[1])


def run_info():
    return dict(dataset="scikit-learn digits (built in)", steps=3, batch_size=16, precision="fp32",
                wall_time_seconds=75.0, trainer="msn-pretrain")


def test_card_has_one_model_index_metric_per_setting_and_a_results_table(tmp_path):
    model = MSNModel(tiny_config())
    processor = MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16, num_focal_views=2)
    results = lowshot_results(offset=0.0)
    path = write_model_card(tmp_path, model, processor, run_info(), results)

    metadata = front_matter(path)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-feature-extraction"
    (entry,) = metadata["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    metrics = {metric["config"]: metric for metric in result["metrics"]}
    assert sorted(metrics) == sorted([*SETTINGS, "knn"])
    assert all(metric["type"] == "accuracy" for metric in metrics.values())
    for name in SETTINGS:
        assert metrics[name]["value"] == round(100 * results["encoders"]["msn"]["logistic"][name]["mean"], 2)
    assert metrics["knn"]["value"] == 55.0
    # huggingface_hub reads the metadata back as evaluation results.
    assert len(ModelCard.load(path).data.eval_results) == len(SETTINGS) + 1

    text = path.read_text()
    title = next(line for line in text.splitlines() if line.startswith("# "))
    assert "ViT 2x64, patch 8" in title and "tiny" not in title
    assert "| MSN (this model) | 50.0 ± 0.2 | 51.0 ± 0.4 | 52.0 ± 0.6 | 53.0 ± 0.8 | 54.0 ± 1.0 | 55.0 |" in text
    assert "| random init, same architecture | 20.0 ± 0.2 |" in text and "| raw pixels | 30.0 ± 0.2 |" in text
    assert "width 64, depth 2, 2 heads, patch 8" in text and "16 x 32" in text
    assert "1 min 15 s" in text and "@inproceedings{assran2022masked" in text
    assert 'pipeline("image-feature-extraction"' in text and "## Limitations" in text


def test_evaluation_updates_the_card_of_a_run_folder(tmp_path):
    model = MSNModel(tiny_config())
    processor = MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16)
    write_model_card(tmp_path, model, processor, run_info(), results=None)
    assert "model-index" not in front_matter(tmp_path / "README.md")
    assert "Not evaluated yet" in (tmp_path / "README.md").read_text()

    update_model_card(tmp_path, lowshot_results(offset=0.25))
    metrics = front_matter(tmp_path / "README.md")["model-index"][0]["results"][0]["metrics"]
    assert {m["config"]: m["value"] for m in metrics}["5-shot"] == 77.0
    assert "width 64, depth 2" in (tmp_path / "README.md").read_text()  # the recipe survives the update
    assert update_model_card(tmp_path / "elsewhere", lowshot_results(0.0)) is None


def test_an_evaluation_on_other_data_names_that_data_not_the_pretraining_sets_hub_id(tmp_path):
    from msn_hf.data import DataArguments
    from msn_hf.evaluation import evaluated_on

    model = MSNModel(tiny_config())
    processor = MSNImageProcessor(size=32, crop_size=32, focal_crop_size=16)
    write_model_card(tmp_path, model, processor, dict(run_info(), dataset="user/cells", dataset_id="user/cells"),
                     lowshot_results(offset=0.0))  # fmt: skip

    def dataset_of_results():
        (entry,) = front_matter(tmp_path / "README.md")["model-index"]
        return entry["results"][0]["dataset"]

    assert dataset_of_results()["type"] == "user/cells"
    held_out = tmp_path / "held-out" / "test"
    held_out.mkdir(parents=True)
    update_model_card(tmp_path, lowshot_results(0.1), evaluated_on(DataArguments(test_dir=str(held_out)),
                                                                   f"test_dir {held_out}"))  # fmt: skip
    # A folder named like a split is named by the folder that holds it; no local path reaches the Hub's metadata.
    assert dataset_of_results() == {"type": "custom", "name": "held-out", "split": "test"}
    limitations = (tmp_path / "README.md").read_text().split("## Limitations")[1]
    assert "Pretrained on user/cells" in limitations and "evaluated on held-out" in limitations
    assert front_matter(tmp_path / "README.md")["datasets"] == ["user/cells"]  # pretrained on it, still
    update_model_card(tmp_path, lowshot_results(0.1), evaluated_on(DataArguments(dataset_name="user/tissue"), "test"))
    assert dataset_of_results() == {"type": "user/tissue", "name": "user/tissue", "split": "test"}


def test_backbone_name_only_claims_a_standard_size_that_matches():
    standard = dict(timm_name="vit_small_patch16_224", width=384, depth=12, patch=16)
    assert backbone_name(standard) == "ViT-S/16"
    assert backbone_name({**standard, "width": 128, "depth": 4, "patch": 8}) == "ViT 4x128, patch 8"
    assert backbone_name({**standard, "timm_name": "vit_base_patch16_224"}) == "ViT 12x384, patch 16"
