"""Low-shot evaluation: sampling, features, classifiers, baselines, datasets and the command line."""

import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_config
from msn_hf import MSNForImageClassification, MSNImageProcessor, MSNModel
from msn_hf.data import ImageDataset, hold_out, load_digits_dataset
from msn_hf.evaluation import (
    evaluate_features,
    evaluate_lowshot,
    extract_features,
    load_evaluation_datasets,
    load_feature_model,
    main,
    random_like,
    sample_fraction,
    sample_per_class,
)


def tiny_processor() -> MSNImageProcessor:
    return MSNImageProcessor(size={"shortest_edge": 32}, crop_size=32, focal_crop_size=16)


@pytest.fixture(scope="module")
def digits():
    """A small stratified-enough slice of the built-in digits: 200 training and 100 test images."""
    train = load_digits_dataset("train").select(range(200))
    test = load_digits_dataset("test").select(range(100))
    return ImageDataset(train, "image", "label"), ImageDataset(test, "image", "label")


@pytest.fixture(scope="module")
def saved_msn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("msn")
    torch.manual_seed(0)
    MSNModel(tiny_config()).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def test_sample_per_class_and_fraction():
    labels = np.repeat(np.arange(4), [10, 10, 10, 3])
    indices = sample_per_class(labels, shots=5, seed=0)
    assert np.bincount(labels[indices]).tolist() == [5, 5, 5, 3]  # a small class gives all it has
    assert len(set(indices)) == len(indices)
    np.testing.assert_array_equal(indices, sample_per_class(labels, 5, seed=0))
    assert not np.array_equal(indices, sample_per_class(labels, 5, seed=1))
    fraction = sample_fraction(labels, fraction=0.2, seed=0)
    assert np.bincount(labels[fraction]).tolist() == [2, 2, 2, 1]  # stratified, at least one per class


def test_extract_features_are_target_class_tokens_and_keep_the_mode(digits):
    train, _ = digits
    model = MSNModel(tiny_config())
    with torch.no_grad():
        for parameter in model.encoder.parameters():  # the anchor must not be what is evaluated
            parameter.add_(1.0)
    model.train()
    subset = ImageDataset(train.dataset.select(range(10)), "image", "label")
    features, labels = extract_features(model, subset, tiny_processor(), batch_size=4, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        pixel_values = tiny_processor()(list(subset.dataset["image"]), return_tensors="pt")["pixel_values"]
        expected = model._encode(model.target_encoder, pixel_values)[0][:, 0]
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, list(subset.dataset["label"]))

    pixels, _ = extract_features(None, subset, tiny_processor(), progress=False)
    assert pixels.shape == (10, 3 * 32 * 32)


def test_extract_features_skips_unreadable_images_with_their_labels():
    image = Image.new("RGB", (32, 32), color=(200, 10, 10))
    records = [{"bytes": b"not an image", "path": None}, image, image]
    dataset = datasets.Dataset.from_dict(
        {"image": records, "label": [0, 1, 2]}, features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    )
    features, labels = extract_features(None, ImageDataset(dataset, "image", "label"), tiny_processor(), progress=False)
    assert features.shape[0] == 2 and labels.tolist() == [1, 2]


def test_classifiers_separate_informative_features_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 4
    train_y, test_y = np.repeat(np.arange(5), 30), np.repeat(np.arange(5), 20)
    train_x = centres[train_y] + rng.normal(size=(150, 16))
    test_x = centres[test_y] + rng.normal(size=(100, 16))
    results = evaluate_features(train_x, train_y, test_x, test_y, shots=(1, 5), label_fraction=0.1, seeds=(0, 1), knn_k=5)
    assert set(results["logistic"]) == {"1-shot", "5-shot", "10%"}
    assert len(results["logistic"]["5-shot"]["runs"]) == 2 and results["num_features"] == 16
    assert results["logistic"]["5-shot"]["mean"] > 0.9 and results["knn"] > 0.9
    noise = evaluate_features(
        rng.normal(size=(150, 16)), train_y, rng.normal(size=(100, 16)), test_y, shots=(5,), seeds=(0,), knn_k=5
    )
    assert noise["logistic"]["5-shot"]["mean"] < 0.6 and noise["knn"] < 0.6


def test_random_like_has_the_same_shape_and_other_weights():
    model = MSNModel(tiny_config())
    random_model = random_like(model, seed=3)
    assert type(random_model) is MSNModel and random_model.config.to_dict() == model.config.to_dict()
    assert not torch.equal(random_model.target_encoder.pos_embed, model.target_encoder.pos_embed)
    torch.testing.assert_close(random_like(model, seed=3).target_encoder.pos_embed, random_model.target_encoder.pos_embed)


def test_evaluate_lowshot_with_baselines_writes_json(digits, tmp_path):
    train, test = digits
    output_file = tmp_path / "eval_results.json"
    model = MSNModel(tiny_config())
    results = evaluate_lowshot(
        model, train, test, tiny_processor(), shots=(1, 5), seeds=(0, 1), baselines=("random", "pixels"),
        output_file=str(output_file), progress=False, label_fraction=0.05,  # 1 image per class of 200 in 10 classes
    )  # fmt: skip
    assert json.loads(output_file.read_text()) == results
    assert list(results["encoders"]) == ["msn", "random", "pixels"]
    assert results["settings"]["num_train"] == 200 and results["settings"]["num_labels"] == 10
    for name, values in results["encoders"].items():
        assert set(values["logistic"]) == {"1-shot", "5-shot", "5%"}, name
        assert 0 <= values["knn"] <= 1
    assert results["encoders"]["random"]["num_features"] == results["encoders"]["msn"]["num_features"] == 64
    # Raw pixels of digits are far above chance: the pipeline from images to classifiers is sound.
    assert results["encoders"]["pixels"]["knn"] > 0.5


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(shots=(0, 5)), "shots"),
        (dict(baselines="random"), "baselines"),
        (dict(baselines=("imagenet",)), "baselines"),
        (dict(label_fraction=1.5), "label_fraction"),
        (dict(seeds=()), "seeds"),
        (dict(knn_k=0), "knn_k"),
    ],
)
def test_bad_settings_name_the_argument(digits, kwargs, argument):
    train, test = digits
    with pytest.raises(ValueError, match=f"`{argument}`"):
        evaluate_lowshot(MSNModel(tiny_config()), train, test, tiny_processor(), **kwargs)


def test_unlabelled_dataset_is_refused(digits):
    train, test = digits
    with pytest.raises(ValueError, match="label column"):
        evaluate_lowshot(MSNModel(tiny_config()), ImageDataset(train.dataset, "image"), test, tiny_processor())


def test_hold_out_is_stratified_and_disjoint(tmp_path):
    data = load_digits_dataset("train").select(range(300)).add_column("id", list(range(300)))
    data.save_to_disk(str(tmp_path / "no-test-split"))
    train, test = load_evaluation_datasets(dataset_name=str(tmp_path / "no-test-split"), test_size=0.25)
    assert len(test.dataset) == 75 and not set(train.dataset["id"]) & set(test.dataset["id"])
    assert len(set(test.dataset["label"])) == 10
    with pytest.raises(ValueError, match="test_size"):
        hold_out(train, test_size=1.5)
    held_out = evaluate_lowshot(
        MSNModel(tiny_config()), train, None, tiny_processor(), shots=(1,), seeds=(0,), knn_k=None, progress=False
    )
    assert held_out["settings"]["num_test"] == 45 and held_out["settings"]["num_train"] == 180


def test_load_feature_model_of_a_classifier_gives_its_encoder_features(saved_msn, tmp_path):
    classifier = MSNForImageClassification.from_pretrained(saved_msn, num_labels=3)
    classifier.save_pretrained(tmp_path)
    encoder = load_feature_model(str(tmp_path)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = encoder(pixel_values).logits
        expected = MSNModel.from_pretrained(saved_msn).eval()(pixel_values).pooler_output
    torch.testing.assert_close(features, expected)


def test_command_line_prints_a_table_and_writes_results(saved_msn, tmp_path, capsys):
    output_file = tmp_path / "results.json"
    results = main([
        "--model_name_or_path", str(saved_msn), "--max_train_samples", "150", "--max_test_samples", "60",
        "--shots", "1", "2", "--seeds", "0", "--baselines", "random", "--output_file", str(output_file),
        "--no_progress", "--device", "cpu",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| msn |" in printed and "| random |" in printed and "kNN (k=20)" in printed
    assert json.loads(output_file.read_text()) == results
    assert results["settings"]["num_test"] == 60 and results["settings"]["shots"] == [1, 2]


def plain_logistic_regression(features, labels, l2_weight, intercept):
    """argmin_{W, b} mean_i CE(W x_i + b, y_i) + l2_weight / 2 * ||W||^2, by L-BFGS in float64."""
    from scipy.optimize import minimize

    num, dim = features.shape
    classes = labels.max() + 1
    x, onehot = torch.tensor(features, dtype=torch.float64), F.one_hot(torch.tensor(labels), classes).double()

    def objective(flat):
        params = torch.tensor(flat, requires_grad=True)
        weights, bias = params[: classes * dim].view(classes, dim), params[classes * dim :]
        logits = x @ weights.t() + (bias if intercept else 0)
        value = -(onehot * logits.log_softmax(dim=1)).sum(dim=1).mean() + l2_weight / 2 * (weights**2).sum()
        value.backward()
        return value.item(), params.grad.numpy()

    result = minimize(objective, np.zeros(classes * dim + classes), jac=True, method="L-BFGS-B", tol=1e-12)
    return result.x[: classes * dim].reshape(classes, dim)


@pytest.mark.parametrize("protocol", ["msn", "standardized"])
def test_logistic_protocols_match_a_plain_rederivation(protocol):
    from msn_hf.evaluation import logistic_classifier, preprocess_features

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 5)
    features = rng.normal(size=(15, 4)) + 2.0 * np.eye(3, 4)[labels] + 3.0
    lambd = 0.05
    n = len(labels)
    if protocol == "msn":
        # The authors: each feature vector centred and L2-normalised; cyanure's lambd divided by n; no intercept.
        centred = features - features.mean(axis=1, keepdims=True)
        plain_x = centred / np.linalg.norm(centred, axis=1, keepdims=True)
        expected = plain_logistic_regression(plain_x, labels, lambd / n, intercept=False)
    else:
        plain_x = (features - features.mean(axis=0)) / features.std(axis=0)
        expected = plain_logistic_regression(plain_x, labels, lambd, intercept=True)
    (processed,) = preprocess_features(protocol, features)
    np.testing.assert_allclose(processed, plain_x, atol=1e-12)
    classifier = logistic_classifier(protocol, lambd, n, max_iter=10_000)
    classifier.set_params(tol=1e-10)
    classifier.fit(processed, labels)
    assert classifier.fit_intercept == (protocol == "standardized")
    # Multinomial weights are defined up to a common shift of the class rows; the L2 penalty picks zero-sum columns.
    np.testing.assert_allclose(classifier.coef_, expected, atol=2e-3 * np.abs(expected).max())


def test_results_state_the_protocol_and_its_regularisation(digits):
    train, test = digits
    results = {}
    for protocol in ("msn", "standardized"):
        results[protocol] = evaluate_lowshot(
            MSNModel(tiny_config()), train, test, tiny_processor(), shots=(2,), label_fraction=None, seeds=(0,),
            knn_k=None, baselines=(), progress=False, protocol=protocol,
        )
        assert results[protocol]["settings"]["protocol"] == protocol
    assert "C = 1 / l2_reg" in results["msn"]["settings"]["regularisation"]
    assert "C = 1 / (l2_reg * n)" in results["standardized"]["settings"]["regularisation"]
    with pytest.raises(ValueError, match="`protocol`"):
        evaluate_lowshot(MSNModel(tiny_config()), train, test, tiny_processor(), protocol="cyanure")
