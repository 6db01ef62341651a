// A real Kubernetes API server for the operator's integration tests, built from Debian's
// packaged sources by scripts/k8s-apiserver-build: the upstream apiextensions-apiserver
// (CRDs, custom resources with schema and CEL validation, status subresources, server-side
// apply, watches) plus plain storage for the built-in types the operator writes, so its
// whole reconcile loop runs against the real thing. The built-in types get no defaulting,
// no validation and no controllers (nothing turns a StatefulSet into pods): storage only.
package main

import (
	"context"
	"os"

	"github.com/spf13/cobra"

	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/names"
	"k8s.io/component-base/cli"
	"k8s.io/kube-openapi/pkg/common"
	openapiutil "k8s.io/kube-openapi/pkg/util"
	"k8s.io/kube-openapi/pkg/validation/spec"
)

type resource struct {
	plural, singular string
	obj, list        runtime.Object
	namespaced       bool
}

var groups = []struct {
	gv        schema.GroupVersion
	resources []resource
}{
	{corev1.SchemeGroupVersion, []resource{
		{"services", "service", &corev1.Service{}, &corev1.ServiceList{}, true},
		{"configmaps", "configmap", &corev1.ConfigMap{}, &corev1.ConfigMapList{}, true},
		{"secrets", "secret", &corev1.Secret{}, &corev1.SecretList{}, true},
		{"pods", "pod", &corev1.Pod{}, &corev1.PodList{}, true},
		{"events", "event", &corev1.Event{}, &corev1.EventList{}, true},
		{"serviceaccounts", "serviceaccount", &corev1.ServiceAccount{}, &corev1.ServiceAccountList{}, true},
	}},
	{appsv1.SchemeGroupVersion, []resource{
		{"statefulsets", "statefulset", &appsv1.StatefulSet{}, &appsv1.StatefulSetList{}, true},
		{"deployments", "deployment", &appsv1.Deployment{}, &appsv1.DeploymentList{}, true},
	}},
	{policyv1.SchemeGroupVersion, []resource{
		{"poddisruptionbudgets", "poddisruptionbudget", &policyv1.PodDisruptionBudget{}, &policyv1.PodDisruptionBudgetList{}, true},
	}},
	{networkingv1.SchemeGroupVersion, []resource{
		{"networkpolicies", "networkpolicy", &networkingv1.NetworkPolicy{}, &networkingv1.NetworkPolicyList{}, true},
	}},
	{coordinationv1.SchemeGroupVersion, []resource{
		{"leases", "lease", &coordinationv1.Lease{}, &coordinationv1.LeaseList{}, true},
	}},
	{eventsv1.SchemeGroupVersion, []resource{
		{"events", "event", &eventsv1.Event{}, &eventsv1.EventList{}, true},
	}},
}

// strategy stores objects as they come; it only keeps metadata.generation honest.
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	namespaced bool
}

func (s strategy) NamespaceScoped() bool { return s.namespaced }
func (strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetGeneration(1)
	}
}
func (strategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	m, err1 := meta.Accessor(obj)
	o, err2 := meta.Accessor(old)
	if err1 != nil || err2 != nil {
		return
	}
	m.SetGeneration(o.GetGeneration())
	if !equality.Semantic.DeepEqual(specOf(obj), specOf(old)) {
		m.SetGeneration(o.GetGeneration() + 1)
	}
}
func specOf(obj runtime.Object) interface{} {
	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil
	}
	delete(u, "metadata")
	delete(u, "status")
	return u
}
func (strategy) Validate(context.Context, runtime.Object) field.ErrorList            { return nil }
func (strategy) WarningsOnCreate(context.Context, runtime.Object) []string             { return nil }
func (strategy) Canonicalize(runtime.Object)                                          {}
func (strategy) AllowCreateOnUpdate() bool                                            { return false }
func (strategy) AllowUnconditionalUpdate() bool                                       { return true }
func (strategy) ValidateUpdate(context.Context, runtime.Object, runtime.Object) field.ErrorList {
	return nil
}
func (strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

func installBuiltins(server *genericapiserver.GenericAPIServer, etcd genericoptions.EtcdOptions) error {
	scheme := runtime.NewScheme()
	var gvs []schema.GroupVersion
	for _, g := range groups {
		internal := schema.GroupVersion{Group: g.gv.Group, Version: runtime.APIVersionInternal}
		for _, r := range g.resources {
			// The same Go type as the external and the internal version: no conversion.
			scheme.AddKnownTypes(g.gv, r.obj, r.list)
			scheme.AddKnownTypes(internal, r.obj, r.list)
		}
		metav1.AddToGroupVersion(scheme, g.gv)
		gvs = append(gvs, g.gv)
	}
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	codecs := serializer.NewCodecFactory(scheme)
	etcd.StorageConfig.Codec = codecs.LegacyCodec(gvs...)
	etcd.StorageConfig.EncodeVersioner = schema.GroupVersions(gvs)
	etcd.StorageConfig.Prefix = "/registry/builtin"
	getter := etcd.CreateRESTOptionsGetter(&genericoptions.SimpleStorageFactory{StorageConfig: etcd.StorageConfig}, nil)
	parameterCodec := runtime.NewParameterCodec(scheme)
	for _, g := range groups {
		info := genericapiserver.NewDefaultAPIGroupInfo(g.gv.Group, scheme, parameterCodec, codecs)
		storage := map[string]rest.Storage{}
		for _, r := range g.resources {
			r := r
			gr := schema.GroupResource{Group: g.gv.Group, Resource: r.plural}
			s := strategy{scheme, names.SimpleNameGenerator, r.namespaced}
			store := &genericregistry.Store{
				NewFunc:                   func() runtime.Object { return r.obj.DeepCopyObject() },
				NewListFunc:               func() runtime.Object { return r.list.DeepCopyObject() },
				DefaultQualifiedResource:  gr,
				SingularQualifiedResource: schema.GroupResource{Group: g.gv.Group, Resource: r.singular},
				CreateStrategy:            s,
				UpdateStrategy:            s,
				DeleteStrategy:            s,
				TableConvertor:            rest.NewDefaultTableConvertor(gr),
			}
			if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: getter}); err != nil {
				return err
			}
			storage[r.plural] = store
		}
		info.VersionedResourcesStorageMap[g.gv.Version] = storage
		var err error
		if g.gv.Group == "" {
			err = server.InstallLegacyAPIGroup("/api", &info)
		} else {
			err = server.InstallAPIGroup(&info)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Server-side apply needs an OpenAPI model of every type. The built-in types' generated
// models live in k8s.io/kubernetes, which Debian does not package: each gets an object
// model that keeps unknown fields, so apply tracks field ownership by map keys (lists are
// atomic), as for a CRD with x-kubernetes-preserve-unknown-fields.
func withBuiltinModels(get common.GetOpenAPIDefinitions) common.GetOpenAPIDefinitions {
	objectMeta, listMeta := metav1.ObjectMeta{}.OpenAPIModelName(), metav1.ListMeta{}.OpenAPIModelName()
	str := spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"string"}}}
	return func(ref common.ReferenceCallback) map[string]common.OpenAPIDefinition {
		defs := get(ref)
		for _, g := range groups {
			for _, r := range g.resources {
				obj, list := typeName(r.obj), typeName(r.list)
				keep := spec.VendorExtensible{Extensions: spec.Extensions{"x-kubernetes-preserve-unknown-fields": true}}
				defs[obj] = common.OpenAPIDefinition{
					Schema: spec.Schema{
						SchemaProps: spec.SchemaProps{Type: []string{"object"}, Properties: map[string]spec.Schema{
							"apiVersion": str, "kind": str,
							"metadata": {SchemaProps: spec.SchemaProps{Ref: ref(objectMeta)}},
						}},
						VendorExtensible: keep,
					},
					Dependencies: []string{objectMeta},
				}
				item := spec.Schema{SchemaProps: spec.SchemaProps{Ref: ref(obj)}}
				defs[list] = common.OpenAPIDefinition{
					Schema: spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"object"}, Properties: map[string]spec.Schema{
						"apiVersion": str, "kind": str,
						"metadata": {SchemaProps: spec.SchemaProps{Ref: ref(listMeta)}},
						"items":    {SchemaProps: spec.SchemaProps{Type: []string{"array"}, Items: &spec.SchemaOrArray{Schema: &item}}},
					}}},
					Dependencies: []string{listMeta, obj},
				}
			}
		}
		return defs
	}
}

func typeName(obj runtime.Object) string {
	return openapiutil.GetCanonicalTypeName(obj)
}

func run(ctx context.Context, o *options.CustomResourceDefinitionsServerOptions) error {
	config, err := o.Config()
	if err != nil {
		return err
	}
	v3 := config.GenericConfig.OpenAPIV3Config
	v3.GetDefinitions = withBuiltinModels(v3.GetDefinitions)
	v3.Definitions = v3.GetDefinitions(func(name string) spec.Ref {
		defName, _ := v3.GetDefinitionName(name)
		return spec.MustCreateRef("#/components/schemas/" + common.EscapeJsonPointer(defName))
	})
	completed := config.Complete()
	// The standalone server switches discovery off (kube-apiserver's aggregator serves it
	// there); kubectl and kube-rs need it.
	completed.GenericConfig.EnableDiscovery = true
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	if err := installBuiltins(server.GenericAPIServer, *o.RecommendedOptions.Etcd); err != nil {
		return err
	}
	return server.GenericAPIServer.PrepareRun().RunWithContext(ctx)
}

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	cmd := &cobra.Command{
		Use: "thynapse-test-apiserver",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return run(c.Context(), o)
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}
