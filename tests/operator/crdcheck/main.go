// crdcheck validates a CustomResourceDefinition with the Kubernetes API server's own code
// (k8s.io/apiextensions-apiserver): the CRD itself (structural schema, CEL rules compiled and their
// estimated cost within the API server's budget), then custom resources against it, defaulted as the
// API server defaults them: the OpenAPI schema, and the x-kubernetes-validations rules (transition
// rules with the old object of an update).
//
//	crdcheck CRD.yaml [CASES.json]
//
// CASES.json: [{"name": ..., "old": object or null, "new": object}]. Prints one JSON object:
// {"crdErrors": [...], "cases": {name: [error, ...]}}. tests/operator/test_crd.py runs it.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/install"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/validation"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	structuraldefaulting "k8s.io/apiextensions-apiserver/pkg/apiserver/schema/defaulting"
	apiservervalidation "k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	"k8s.io/apimachinery/pkg/runtime"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"sigs.k8s.io/yaml"
)

type testCase struct {
	Name string                 `json:"name"`
	Old  map[string]interface{} `json:"old"`
	New  map[string]interface{} `json:"new"`
}

type report struct {
	CRDErrors []string            `json:"crdErrors"`
	Cases     map[string][]string `json:"cases"`
}

func main() {
	data, err := os.ReadFile(os.Args[1])
	must(err)
	var v1crd apiextensionsv1.CustomResourceDefinition
	must(yaml.UnmarshalStrict(data, &v1crd))
	scheme := runtime.NewScheme()
	install.Install(scheme)
	var crd apiextensions.CustomResourceDefinition
	must(scheme.Convert(&v1crd, &crd, nil))
	// As the API server has it once stored (storedVersions is set by the server, not the manifest).
	for _, version := range crd.Spec.Versions {
		if version.Storage {
			crd.Status.StoredVersions = []string{version.Name}
		}
	}
	out := report{CRDErrors: []string{}, Cases: map[string][]string{}}
	for _, e := range validation.ValidateCustomResourceDefinition(context.TODO(), &crd) {
		out.CRDErrors = append(out.CRDErrors, e.Error())
	}
	props := crd.Spec.Versions[0].Schema
	if crd.Spec.Validation != nil { // one schema for every version: the internal type keeps it here
		props = crd.Spec.Validation
	}
	if len(os.Args) > 2 && len(out.CRDErrors) == 0 {
		structural, err := structuralschema.NewStructural(props.OpenAPIV3Schema)
		must(err)
		rules := cel.NewValidator(structural, true, celconfig.PerCallLimit)
		schema, _, err := apiservervalidation.NewSchemaValidator(props.OpenAPIV3Schema)
		must(err)
		casesData, err := os.ReadFile(os.Args[2])
		must(err)
		var cases []testCase
		must(utiljson.Unmarshal(casesData, &cases)) // integers as int64, as the API server decodes them
		for _, c := range cases {
			var oldObj interface{}
			if c.Old != nil {
				structuraldefaulting.Default(c.Old, structural)
				oldObj = c.Old
			}
			structuraldefaulting.Default(c.New, structural)
			errs := []string{}
			for _, e := range apiservervalidation.ValidateCustomResource(nil, c.New, schema) {
				errs = append(errs, e.Error())
			}
			celErrs, _ := rules.Validate(context.TODO(), nil, structural, c.New, oldObj, celconfig.RuntimeCELCostBudget)
			for _, e := range celErrs {
				errs = append(errs, e.Error())
			}
			out.Cases[c.Name] = errs
		}
	}
	encoded, err := json.MarshalIndent(out, "", "  ")
	must(err)
	fmt.Println(string(encoded))
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
}
